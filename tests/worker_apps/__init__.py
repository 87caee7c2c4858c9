"""Task modules run by real ``brokerd-worker`` processes in tests/worker/test_worker.py."""
