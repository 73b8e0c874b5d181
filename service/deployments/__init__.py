"""The Ray Serve deployments: the model replicas, their admission control and engine loop, the ingress."""
