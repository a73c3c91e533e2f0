"""Deciding, part two: the load-balancing policies that pick one worker of a route.

Layer: the bottom of the deciding layer; policies see a route only through
:class:`proxy_workers.policies.base.RouteView` and never import routing.
"""
