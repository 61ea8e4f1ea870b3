// Starts Swagger UI on /openapi.json (served by this API; no CDN). Kept out of the page so the CSP needs no
// inline script. persistAuthorization keeps the token entered under "Authorize" across reloads.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
