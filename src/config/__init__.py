"""What the pipeline is told: params.yaml's schema, the stage's declared params, the contract, paths."""
