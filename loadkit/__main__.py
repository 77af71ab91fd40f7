import sys

from loadkit.cli import main

sys.exit(main())
