import sys

from iil_dist.cli import main

sys.exit(main())
