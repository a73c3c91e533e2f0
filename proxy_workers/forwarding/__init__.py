"""The rules every carrying path shares, each in one place.

Attempts (pick, decision counting, a worker cell's books), the retry decision, header rules both
ways and gRPC metadata, the prefill/decode handoff, and the request as a worker gets it. The HTTP,
HTTP PD and gRPC paths call these; none re-implements them.
"""
