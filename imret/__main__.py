import sys

from imret.cli import main

sys.exit(main())
