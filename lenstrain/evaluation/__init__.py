"""A trained run, used: metrics (:mod:`.metrics`), ``lenstrain eval`` (:mod:`.evaluate`, with its plots in
:mod:`.plots`), batched inference (:mod:`.inference`), ``lenstrain export`` (:mod:`.export`) and predictions on
image files (:mod:`.predict_files`)."""
