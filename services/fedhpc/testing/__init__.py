"""Helpers for tests and benchmarks: free ports, a throwaway SeaweedFS S3 server."""
