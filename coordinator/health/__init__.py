"""Health of the fleet: active probes (HTTP and gRPC), passive health from the load board,
half-open readmission, and the engines' own load figures (for least_loaded).
"""
