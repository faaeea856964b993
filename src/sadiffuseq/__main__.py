import sys

from sadiffuseq.cli import main

sys.exit(main())
