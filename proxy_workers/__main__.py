"""Entry point of one proxy process: ``python -m proxy_workers --instance ID --index N``."""

import sys

from proxy_workers.serving.process import main

sys.exit(main())
