import sys

from glm130b.cli import main

sys.exit(main())
