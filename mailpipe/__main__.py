import sys

from mailpipe.cli import main

sys.exit(main())
