from norm.app.cli import main

raise SystemExit(main())
