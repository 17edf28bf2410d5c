"""The old name of `python -m vlp.importer`, kept so that existing `python -m vlp.import ...` commands work.

`import` is a Python keyword, so `import vlp.import` cannot be written; code imports `vlp.importer`.
"""

import sys

from vlp.importer import main

if __name__ == "__main__":
    print("note: `python -m vlp.import` is now `python -m vlp.importer`", file=sys.stderr)
    sys.exit(main())
