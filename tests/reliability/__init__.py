"""Reliability, security and load suite (issue #7); scripts/reliability.py runs it in full."""
