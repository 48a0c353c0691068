"""expertmesh: expert-parallel serving of Mixtral-style mixture-of-experts models on Ray."""
