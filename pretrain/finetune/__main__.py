from pretrain.finetune.stage import main

raise SystemExit(main())
