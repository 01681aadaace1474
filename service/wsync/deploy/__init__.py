"""Running the control plane elsewhere: wsync.deploy.serve (a Ray Serve application on an existing Ray
cluster, e.g. a KubeRay RayService)."""
