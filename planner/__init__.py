"""Hardware and cost planning (`splitserve plan`): memory per GPU, the TP x PP layout that
fits, and what it costs, from the article's cited numbers."""
