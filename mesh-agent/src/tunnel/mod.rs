//! HBONE tunnels between node agents: HTTP/2 CONNECT over mutual TLS.
