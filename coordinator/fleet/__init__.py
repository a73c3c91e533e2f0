"""The fleet: worker membership, the snapshot built from it, and the routers' topology.

Nothing here does I/O; discovery and health fill the fleet in, the arbiter publishes it.
"""
