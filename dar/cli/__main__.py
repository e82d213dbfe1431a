import sys

from dar.cli import main

sys.exit(main())
