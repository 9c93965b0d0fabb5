from pretrain.evaluate.run import main

raise SystemExit(main())
