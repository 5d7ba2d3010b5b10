import sys

from hpcsoup.cli import main

sys.exit(main())
