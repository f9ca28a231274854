from kvfabric.cli import main

raise SystemExit(main())
