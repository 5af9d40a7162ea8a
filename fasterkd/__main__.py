import sys

from fasterkd.cli import main

sys.exit(main())
