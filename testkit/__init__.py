"""Test support shared by tests/ and bench/: the project's test params, a throwaway-repo builder, loopback servers. Never imported by src/."""
