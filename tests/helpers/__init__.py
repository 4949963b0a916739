"""What the test modules share (tests/conftest.py holds only the pytest hooks and fixtures), and small programs the
tests launch as separate processes."""
