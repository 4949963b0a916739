"""Small programs the tests launch as separate processes."""
