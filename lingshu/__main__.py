from lingshu.cli import main

raise SystemExit(main())
