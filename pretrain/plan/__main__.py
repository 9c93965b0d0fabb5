import sys

from pretrain.plan.cli import main

sys.exit(main())
