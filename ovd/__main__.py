import sys

from ovd.cli import main

sys.exit(main())
