"""Starting the service on one machine: Ray, the Serve applications and the HAProxy front."""
