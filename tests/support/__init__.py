"""Shared by the tests and bench/: the one way to run a real brokerd process."""
