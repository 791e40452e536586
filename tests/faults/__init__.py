"""Helpers for the fault and abuse suite: hostile files, a fault-injecting S3 proxy, a worker harness, a recorder."""
