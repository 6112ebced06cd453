"""The ROS-free engine: backends, prompt format, tools and grammar, scheduler, world state.

Nothing under this package imports rclpy.
"""
