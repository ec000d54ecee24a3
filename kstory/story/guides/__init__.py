"""Guide images for the ControlNets: OpenPose renders, canny edges, depth maps, or ready images."""
