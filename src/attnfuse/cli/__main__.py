from attnfuse.cli.main import main

raise SystemExit(main())
