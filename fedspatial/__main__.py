import sys

from fedspatial.cli import main

sys.exit(main())
