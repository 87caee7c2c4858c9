"""Task modules run by real ``brokerd-worker`` processes in tests/test_worker.py."""
