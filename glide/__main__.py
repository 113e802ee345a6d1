import sys

from glide.cli import main

sys.exit(main())
