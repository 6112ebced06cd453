"""nemotron_ros: an on-robot language model node (engine in ``nemotron_ros.engine``)."""
