import sys

from postcopy.cli import main

sys.exit(main())
