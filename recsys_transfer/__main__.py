import sys

from recsys_transfer.cli import main

sys.exit(main())
