import sys

from s2meta.cli import main

sys.exit(main())
