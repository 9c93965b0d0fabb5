from pretrain.train.run import main

raise SystemExit(main())
