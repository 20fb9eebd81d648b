"""Scaling laws for finetuning: collect run records, fit laws, held-out error, critical data
size, bootstrap uncertainty, tables and figures.

Modules (one idea each):
  laws        the law registry; each law is one log-space function (log L = logsumexp of terms)
  optimize    a vectorised box-constrained L-BFGS (many problems at once)
  fitting     Huber objective, variable-projection grid search, polish, certification
  procedures  the paper and Chinchilla presets; the paper's two-stage shared beta/E procedure
  heldout     held-out splits by factor values; Delta (mean absolute deviation), RMSE
  critical    critical finetuning size between methods (bracketed roots, closed form)
  bootstrap   cluster bootstrap over configurations and seeds, vectorised refits, prediction
              bands
  table       the tidy table; records: run records -> tidy table
  report      Markdown tables in the paper's layouts; plots: figures
  planted     the paper's grid and Table 4 laws, for planted-truth studies
  fit         the command line: python -m scaling.fit --runs=DIR --out=OUT

Importing scaling does not touch JAX settings (it is numpy/scipy only).
"""
