"""One module per lifecycle step. Each has `NEEDS` (the stages whose outputs it reads),
`SECTIONS` (the recipe sections that configure it) and `run(ctx)`: inputs on disk ->
outputs on disk under `ctx.out`. A stage imports no other stage; `lmlab.pipeline` runs them."""
