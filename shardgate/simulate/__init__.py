"""``shardgate simulate``: a discrete-event capacity simulator on the production policy code.

Role: answer "which policy, how many workers, what happens when 10% fail" before touching
production, with the router's own decision code: the policy classes, ``RoutingTable`` routes, the
load board and affinity table in shared memory, filled by simulated traffic instead of real
traffic. Modules, from the inputs to the report:

- ``workload``: arrivals (Poisson, bursts, trace files), request costs, priorities, multi-turn
  conversations with shared system prompts, each request with a real chat body;
- ``workers``: the simulated servers (slots, priority queue, prefix cache, per-token costs);
- ``config``: one run's parameters (:class:`SimConfig`) and what is derived from them;
- ``harness``: the production side (snapshot, shared memory, routes, seeded policies);
- ``engine``: the event loop; ``stats``: figures, summary, table; ``plot``: the PNG chart;
- ``run``: the API (:func:`shardgate.simulate.run.simulate`); ``cli``: the subcommand.

The model and its parameters: docs/simulator.md.
"""
