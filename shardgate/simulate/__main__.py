"""``python3 -m shardgate.simulate ...``: the ``simulate`` subcommand on its own."""

from shardgate.simulate.cli import main

raise SystemExit(main())
