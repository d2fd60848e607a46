"""A stand-in for the sglang package in the lifeline test (tests/test_lifeline.py): not SGLang, only a process tree
shaped like a server's, so that the shielded launcher's end with its trainer is checked in a second, not in the 30 s
a real server takes to start (the real server is checked in tests/test_faults.py)."""
