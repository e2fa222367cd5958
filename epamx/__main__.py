from epamx.cli import main

raise SystemExit(main())
